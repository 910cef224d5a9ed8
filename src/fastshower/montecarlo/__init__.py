"""Reference Monte Carlo: Geant4 calorimeters and the air-shower hybrid (CONEX-like, SIBYLL via chromo).

:mod:`~fastshower.montecarlo.backend` is the protocol a Monte Carlo implements, and
:mod:`~fastshower.montecarlo.run` the chunked, seeded, resumable production driver ``run.simulate``.
The package is called ``montecarlo``, not ``simulate``, because the public function
``fastshower.simulate`` needs that name at the top level of the package.
"""
