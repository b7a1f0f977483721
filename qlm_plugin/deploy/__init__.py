"""How the product starts its processes: child processes that import the same package as their
parent (:mod:`.child_process`), and instances as Ray actors (:mod:`.ray_fleet`)."""
