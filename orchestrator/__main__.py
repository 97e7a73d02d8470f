from orchestrator.command import main

main()
