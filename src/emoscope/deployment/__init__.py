"""The deployment side's shared parts: what the audit measures once on the reference (`reference`) and every
candidate build it can be compared with (`candidates`). The audit stage, layer sensitivity and the canary are built
on these two modules and on nothing private of each other."""
