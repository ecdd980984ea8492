"""Word lists the generators share: first and last names, cities. Plain data, no logic."""

from __future__ import annotations


def _words(text: str) -> list[str]:
    return text.split()


FIRST_NAMES = _words(
    "Aaron Abigail Adrian Aisha Alan Alice Amara Amir Ana Andre Anika Anton Beatriz Ben Bianca Boris "
    "Carla Carlos Chen Chloe Clara Daniel Dara Deepak Diego Dmitri Elena Eli Emeka Emma Erik Esther "
    "Fatima Felix Fiona Gabriel Grace Hana Hassan Helen Hugo Ines Ivan Jade James Javier Jin Joao "
    "Julia Kai Karen Kenji Lars Layla Leo Lina Lucas Mai Marco Maria Mateo Maya Mei Mohammed Nadia "
    "Nina Noah Olga Omar Oscar Paula Pedro Priya Rafael Rana Ravi Rosa Ruth Sam Sara Sean Sofia "
    "Tariq Tom Uma Victor Wei Yara Yusuf Zoe"
)

LAST_NAMES = _words(
    "Abbott Adeyemi Alvarez Andersen Baker Banerjee Becker Bianchi Brooks Campbell Castro Chen Cohen "
    "Costa Dubois Edwards Evans Fischer Flores Garcia Gomez Gupta Hansen Hayes Hughes Ibrahim Ito "
    "Jensen Kaur Kim Kowalski Larsen Lee Lopez Martin Meyer Miller Moreau Murphy Nakamura Nguyen "
    "Novak Okafor Olsen Park Patel Perez Petrov Quinn Reyes Rossi Santos Schmidt Shah Silva Singh "
    "Suzuki Tanaka Torres Varga Wagner Walsh Wang Weber Wilson Wright Yamamoto Young Zhang"
)

CITIES = _words(
    "Amsterdam Athens Austin Bangkok Barcelona Berlin Bogota Boston Brisbane Budapest Cairo Calgary "
    "Chicago Copenhagen Dallas Denver Dublin Edinburgh Geneva Glasgow Hamburg Helsinki Istanbul "
    "Jakarta Johannesburg Kyoto Lagos Leeds Lima Lisbon Liverpool London Lyon Madrid Manchester "
    "Marseille Melbourne Miami Milan Montreal Mumbai Munich Nairobi Naples Osaka Oslo Ottawa Paris "
    "Perth Phoenix Porto Prague Quito Riga Rome Seattle Seoul Seville Singapore Stockholm Sydney "
    "Taipei Tokyo Toronto Turin Valencia Vancouver Vienna Warsaw Zurich"
) + [
    "New York",
    "Los Angeles",
    "San Francisco",
    "Buenos Aires",
    "Mexico City",
    "Cape Town",
    "Hong Kong",
    "Kuala Lumpur",
    "Rio de Janeiro",
    "Tel Aviv",
    "New Delhi",
    "St. Louis",
]
