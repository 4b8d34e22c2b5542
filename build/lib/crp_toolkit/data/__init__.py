"""Models and datasets: adapters for what researchers have, and the project's own fixtures."""
