"""make demo / make demo-down (placeholder until the agent lands)."""
import sys
print("tortie demo: the cluster parts (agent, CNI) are still being built; nothing was created.")
sys.exit(0)
