from fedmq.cli import main

main()
