"""Mining the dataset store: reference samples, class statistics, prototypes, similarity."""

from crp_toolkit.mining.references import ReferenceTable, reference_samples

__all__ = ["ReferenceTable", "reference_samples"]
