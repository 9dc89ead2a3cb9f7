"""Named model shapes, shared by the tests, the benchmarks and the examples.

DeepSeek-V3 (and R1) routed experts, from the model's config.json: 256 experts, hidden size
7168, moe_intermediate_size 2048, 8 experts per token chosen from the best 4 of 8 groups, routed
scaling factor 2.5. Tensor parallelism over P devices gives each device I / P of every expert
(the seed serves DeepSeek-V3 with P = 4: I = 512).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """A routed-expert MoE layer: `experts` experts of [hidden -> intermediate -> hidden]."""

    name: str
    experts: int
    hidden: int
    intermediate: int      # per device, after tensor parallelism
    top_k: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float

    def tensor_parallel(self, size: int) -> "MoEShape":
        """The per-device shape when `size` devices split the intermediate dimension."""
        if self.intermediate % size or (self.intermediate // size) % 128:
            raise ValueError(f"{self.name}: I = {self.intermediate} does not split into {size} slices "
                             "of a multiple of 128")
        return dataclasses.replace(self, name=f"{self.name}-tp{size}", intermediate=self.intermediate // size)

    def gemm1(self) -> tuple[int, int]:
        """(N, K) of the gate/up GEMM: [rows, hidden] x [experts, 2I, hidden]."""
        return 2 * self.intermediate, self.hidden

    def gemm2(self) -> tuple[int, int]:
        """(N, K) of the down GEMM: [rows, I] x [experts, hidden, I]."""
        return self.hidden, self.intermediate


DEEPSEEK_V3 = MoEShape("deepseek-v3", experts=256, hidden=7168, intermediate=2048, top_k=8, n_group=8,
                       topk_group=4, routed_scaling_factor=2.5)
# The seed's serving configuration (--tp 4): what one GPU holds of every expert.
DEEPSEEK_V3_TP4 = DEEPSEEK_V3.tensor_parallel(4)
