"""Figures: heatmaps, and (later) concept atlases and the HTML atlas."""
