"""A soak of the gateway under a mixed workload with faults injected on a schedule."""
