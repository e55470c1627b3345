"""Pipeline parallelism: layer placement, point-to-point exchange and microbatch schedules."""
