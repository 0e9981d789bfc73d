from interbrain.cli import main

raise SystemExit(main())
