"""DenseFlow (Grcic et al., NeurIPS 2021), the base EIW-Flow's results use: invertible dense blocks
with cross-unit noise augmentation and attention coupling networks (docs/model.md, "DenseFlow base")."""
