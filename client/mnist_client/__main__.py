from mnist_client.cli import main

raise SystemExit(main())
