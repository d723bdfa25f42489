from mlxsft.cli import main

main()
