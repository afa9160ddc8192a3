"""ftjax: a JAX/Flax framework for training Free Transformers (Fleuret, arXiv 2510.17558)."""
