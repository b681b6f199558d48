"""Facts about the transformer's tensors by their state_dict names (torch-free, so the memory planner can use them)."""

import re

# Tensors that are not matrices worth storing in fp8: norms, embedders, pad tokens, biases. The memory planner
# counts fp8 bytes with this pattern and zimage.speed.fp8 quantises by it: one definition for both.
FP8_KEEP = re.compile(r"(norm|embed|pad_token|bias$)")
