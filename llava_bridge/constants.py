"""Special tokens shared by the bridge's processors, the instruction-data builders and evaluation."""

IMAGE_TOKEN = "<image>"
"""Where the image's patch features go in a prompt (LLaVA's placeholder)."""

REGION_TOKEN = "<region>"
"""Replaced by one region's feature; written right after that region's coordinates (Ferret's hybrid
region representation: the box as text plus a feature pooled from the tower)."""
