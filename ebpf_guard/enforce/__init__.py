"""The response side: what stops an agent, and where.

actuator (signals, freeze, kill after a decision), cgroups (freezers, scope marks), gates
(fanotify permission events for protected files and tool binaries), jail (Landlock for
`run`), egress (cgroup-BPF connect/sendmsg). docs/architecture.md says which verdict each
enforces and whether it prevents or contains.
"""
