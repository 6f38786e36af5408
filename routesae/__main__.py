from routesae.cli import main

main()
