"""Dash pages: one module per page, imported by Dash itself (never import them elsewhere)."""
