"""Expert and data parallelism on torch.distributed (torchrun; gloo on CPU, NCCL on GPU).

expert_parallel(model, group)   shard every MoE layer's experts over a process group, in place
all_to_all(x, out, in, group)   the differentiable uneven exchange behind it
moekit.parallel.training        the trainer's groups, gradient sync and checkpoint layout
Data flow and a model of the costs: docs/scaling.md.
"""

from .comm import all_to_all, process_group
from .expert_parallel import ExpertParallel, expert_parallel, sharded_parameters

__all__ = ["ExpertParallel", "all_to_all", "expert_parallel", "process_group", "sharded_parameters"]
