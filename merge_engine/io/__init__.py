"""Everything that touches disk: reading checkpoints, writing shards, atomic output."""
