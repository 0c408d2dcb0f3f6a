"""gctkd: general cyclical training and distillation for timm and PyTorch image models.

One cyclical factor xi (Smith, 2022, "General Cyclical Training of Neural Networks")
drives every training knob: weight decay, softmax temperature, gradient clipping, focal
loss mix, KD temperature and the distillation weights. See ``gctkd.cycle`` for the
schedule and ``gctkd.engine.trainer`` for the one training loop.
"""

__version__ = "0.1.0"
