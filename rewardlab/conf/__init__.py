"""The packaged configs (Hydra reads them as package data: `pkg://rewardlab.conf`)."""
