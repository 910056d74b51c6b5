"""Figures: analysis result dataclasses in, ``plotly.graph_objects.Figure`` out (no torch, no dash)."""
