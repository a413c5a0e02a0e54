"""The memory planner: fake-tensor peak prediction, the micro-batch search, its report."""
