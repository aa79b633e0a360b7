"""dymoe.models: the small MoE model that ships with dymoe (``demo/``), trained by
scripts/train_demo_model.py; see demo/README.md for its model card."""
