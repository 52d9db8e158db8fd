"""Shared test set-up."""

import os

# moshi reads this when its modules are imported: without it every test would pay torch.compile's
# start-up on CPU for nothing.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
