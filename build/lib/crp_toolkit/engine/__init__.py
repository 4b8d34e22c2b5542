"""The LRP engine: tracing, rules, composites, canonizers and the analyzer."""
