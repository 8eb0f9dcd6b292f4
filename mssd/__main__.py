from mssd.cli import main

main()
