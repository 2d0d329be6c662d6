from spegeld.cli import main

main()
