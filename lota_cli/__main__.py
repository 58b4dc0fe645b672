from lota_cli.cli import main

main()
