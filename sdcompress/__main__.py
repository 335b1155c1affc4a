from sdcompress.cli.app import main

main()
