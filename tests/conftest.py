import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import reference.py

# The models under test are tiny: one thread is as fast, and it keeps the suite steady on a busy 2-core
# machine, where intra-op threads fighting over cores slowed some tests tenfold.
torch.set_num_threads(1)
