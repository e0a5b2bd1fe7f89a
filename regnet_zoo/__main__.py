from regnet_zoo.cli import main

raise SystemExit(main())
