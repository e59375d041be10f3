import sys
from pathlib import Path

import torch

# Regression tests import the reference implementation that lives beside them.
sys.path.insert(0, str(Path(__file__).parent / "regression"))
torch.set_num_threads(min(2, torch.get_num_threads()))
