from twinbatch.entrypoints.cli import main

main()
