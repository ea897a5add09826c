from sqlproxy.cli import main

main()
