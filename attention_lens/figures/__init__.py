"""Figures: analysis results in, ``plotly.graph_objects.Figure`` out (no torch, no dash)."""
