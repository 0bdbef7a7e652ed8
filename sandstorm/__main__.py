from sandstorm.cli.main import main

raise SystemExit(main())
