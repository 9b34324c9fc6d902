from phoneagent.cli import main

main()
