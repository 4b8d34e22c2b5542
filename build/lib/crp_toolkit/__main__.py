from crp_toolkit.app.cli import main

main()
