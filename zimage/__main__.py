from zimage.cli.main import main

raise SystemExit(main())
