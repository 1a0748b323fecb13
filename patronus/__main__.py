from patronus.cli import main

main()
