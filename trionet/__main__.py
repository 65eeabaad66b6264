from trionet.cli import main

raise SystemExit(main())
