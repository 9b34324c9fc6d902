from remotehost.cli import main

main()
