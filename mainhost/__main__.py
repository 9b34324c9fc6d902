from mainhost.cli import main

main()
