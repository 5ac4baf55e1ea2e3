from kbitcli.commands.app import main

main()
