"""Concept Relevance Propagation: conditional relevance of concepts in chosen layers."""
