from sandstorm.cli import main

raise SystemExit(main())
