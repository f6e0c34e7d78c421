from cifar_dist.cli import main

raise SystemExit(main())
