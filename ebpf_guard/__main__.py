from ebpf_guard.cli import main

main()
