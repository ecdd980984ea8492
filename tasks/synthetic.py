"""Synthetic routing tasks: many seeded generators of user prompts that a router can tell apart.

A task is one kind of request (translate, summarize, write a poem, convert units, ...) about one
domain (astronomy, cooking, law, ...): "synth-07-law-translate" asks for translations of
sentences about courts and contracts. Tasks differ in what is asked (the kind's phrasings) and
in what it is about (the domain's topics, sentences, units, people), never by a label that every
prompt repeats, so telling them apart takes reading the content, as with real adapters.

    tasks = synthetic_tasks(64, seed=0)                  # 64 distinct (kind, domain) pairs
    train = tasks[3].prompts(40, seed=0)                 # 40 distinct prompts
    heldout = tasks[3].prompts(40, seed=1)               # none of them in `train`

There are 16 kinds x 16 domains (MAX_TASKS = 256 tasks); each kind has 5-6 phrasings, each domain
14-16 topics, 8 sentences, 5 people, 6 purposes and 4 sentences of context, so two prompts of one
task are seldom near-copies, and every task has room for 150 prompts per seed or more.

Train and held-out sets do not overlap by construction: every prompt's request (the filled-in
phrasing, without the closing instruction, context, greeting or thanks around it) hashes to one
of SEED_SPLITS buckets, and seed s draws only from bucket s % SEED_SPLITS: seeds 0..7 (any two
seeds that differ modulo 8) never share a prompt, nor two prompts that make the same request.

Everything is plain data and `random.Random`; it knows nothing of models, adapters or routers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SEED_SPLITS = 8  # prompts of seeds that differ modulo SEED_SPLITS are disjoint
GIVE_UP_AFTER = 20_000  # draws in a row with nothing new: a task's requests for a seed are spent


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(";") if part.strip())


def _unit_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """'light-years > kilometres; ...' -> (("light-years", "kilometres"), ...)."""
    pairs = (part.split(">") for part in _split(text))
    return tuple((source.strip(), target.strip()) for source, target in pairs)


@dataclass(frozen=True)
class Domain:
    """What prompts are about: topics (noun phrases), sentence frames with a {topic} slot,
    people, units to convert, whom a request is for, and first-person sentences of context."""

    key: str
    topics: tuple[str, ...]
    frames: tuple[str, ...]
    roles: tuple[str, ...]
    units: tuple[tuple[str, str], ...]  # (from, to)
    purposes: tuple[str, ...]  # "for our stargazing club": whom or what a request is for
    contexts: tuple[str, ...]


@dataclass(frozen=True)
class RequestKind:
    """What is asked: phrasings with slots ({topic}, {sentence}, {passage}, {n}, ...) and
    optional closing instructions of the kind's own."""

    key: str
    templates: tuple[str, ...]
    extras: tuple[str, ...]


# -- domains ---------------------------------------------------------------------------------

DOMAINS: tuple[Domain, ...] = (
    Domain(
        key="astronomy",
        topics=_split(
            "black holes; the Andromeda galaxy; solar eclipses; the rings of the planet Saturn; "
            "neutron stars; the Big Bang; meteor showers in the night sky; planets orbiting other stars; "
            "the phases of the moon; red giant stars; the Milky Way galaxy; comets in the night sky; "
            "dark matter in galaxies; the Hubble space telescope; young stars in nebulae; "
            "backyard telescopes"
        ),
        frames=(
            "Last night the observatory opened its dome so visitors could learn about {topic}.",
            "The new space telescope sent back sharp images related to {topic}.",
            "Clear skies over the desert made it a perfect night to study {topic}.",
            "Scientists published new measurements of {topic} this week.",
            "My daughter keeps asking about {topic} after the planetarium show.",
            "The lecture on {topic} ended with a look through the big telescope.",
            "Our star party spent the whole evening arguing about {topic}.",
            "The night sky app has a surprisingly detailed page on {topic}.",
        ),
        roles=_split("astronomer; astrophysicist; planetarium guide; amateur stargazer; telescope maker"),
        units=_unit_pairs(
            "light-years > kilometres; astronomical units > miles; parsecs > light-years; "
            "kelvin > degrees Celsius"
        ),
        purposes=_split(
            "for our stargazing club; for the observatory newsletter; for a night-sky talk at the library; "
            "for my telescope blog; for a school science night about space; for our planetarium visitors"
        ),
        contexts=_split(
            "I just bought my first telescope.; I'm giving a talk at the local stargazing club.; "
            "My son is obsessed with space right now.; I'm writing a piece for our observatory newsletter."
        ),
    ),
    Domain(
        key="cooking",
        topics=_split(
            "sourdough bread; mushroom risotto; bechamel sauce; braised short ribs; fresh egg pasta; "
            "fluffy pancakes; roast chicken; vegetable curry; chocolate chip cookies; French omelettes; "
            "flaky pie crust; stir-fry sauce; salted caramel sauce; lentil soup"
        ),
        frames=(
            "I tried a new recipe for {topic} and burned the bottom of the pan.",
            "The little restaurant down the street is famous for its {topic}.",
            "My grandmother always made {topic} with a pinch of nutmeg.",
            "The evening class tonight covers {topic} from scratch.",
            "We served {topic} at the dinner party and everyone asked for seconds.",
            "The recipe for {topic} calls for more butter than I expected.",
            "Our oven runs hot, so {topic} always comes out a little dark.",
            "The chef showed us how to season {topic} properly.",
        ),
        roles=_split("chef; pastry cook; food blogger; line cook; home baker"),
        units=_unit_pairs(
            "cups > millilitres; ounces > grams; degrees Fahrenheit > degrees Celsius; "
            "tablespoons > teaspoons"
        ),
        purposes=_split(
            "for my recipe blog; for our supper club; for the bakery's chalkboard; "
            "for a kitchen class I teach; for my food channel; for the restaurant's menu insert"
        ),
        contexts=_split(
            "I'm cooking for eight people on Saturday.; My oven is older than I am.; "
            "I'm trying to eat less meat this year.; My kids are picky eaters."
        ),
    ),
    Domain(
        key="law",
        topics=_split(
            "breach of contract; tenant rights; small claims court; a copyright lawsuit; "
            "non-compete clauses in a contract; power of attorney; wrongful dismissal claims; "
            "the statute of limitations; a legal will; trademark law; jury duty in court; "
            "a defamation lawsuit; probate court; a confidentiality contract"
        ),
        frames=(
            "The judge postponed the hearing on {topic} until next month.",
            "My landlord's attorney sent a letter that mentions {topic}.",
            "The firm hired a new associate who specialises in {topic}.",
            "The court ruled against the company in a dispute over {topic}.",
            "Our contract has a long clause about {topic} that nobody read.",
            "The free legal clinic gave a short talk on {topic}.",
            "A recent appeal changed how courts look at {topic}.",
            "The client signed the papers without asking about {topic}.",
        ),
        roles=_split("lawyer; paralegal; judge; solicitor; law student"),
        units=_unit_pairs("days of notice > weeks; billable hours > working days; years of a lease > months"),
        purposes=_split(
            "for our law firm's newsletter; for a legal clinic handout; for my contract law seminar; "
            "for the tenants' association meeting; for new paralegals at the firm; "
            "for a courtroom training day"
        ),
        contexts=_split(
            "My landlord is refusing to return my deposit.; I'm starting a small business with a friend.; "
            "I'm in my second year of studying for the bar.; A former employer just sent me a letter."
        ),
    ),
    Domain(
        key="football",
        topics=_split(
            "the offside rule; penalty shootouts; the 4-3-3 team formation; VAR reviews of goals; "
            "the Champions League final; set pieces near goal; goalkeeper training; the transfer window; "
            "yellow cards in a match; counter-attacking football; the World Cup qualifiers; "
            "youth academies at league clubs; free kicks; high pressing as a team"
        ),
        frames=(
            "The referee's decisions got the home fans shouting about {topic}.",
            "Our coach spent the whole training session on {topic}.",
            "The pundits on TV could not stop talking about {topic}.",
            "After the derby everyone at the pub was discussing {topic}.",
            "The club's new manager has strong opinions on {topic}.",
            "Last season's title race came down to {topic}.",
            "The under-12 squad practised {topic} in the rain for two hours.",
            "The stadium announcer made a joke about {topic} at half time.",
        ),
        roles=_split("coach; striker; referee; goalkeeper; club scout"),
        units=_unit_pairs(
            "yards > metres; kilometres run per match > miles; minutes of stoppage time > seconds; "
            "kilometres per hour > miles per hour"
        ),
        purposes=_split(
            "for our club's match-day programme; for the supporters' podcast; for my under-12 squad; "
            "for the stadium's fan zone; for a coaching badge course; for our five-a-side group chat"
        ),
        contexts=_split(
            "I coach my daughter's under-12 team.; I've supported the same club since I was six.; "
            "My fantasy league draft is this weekend.; We watch every match at the pub."
        ),
    ),
    Domain(
        key="gardening",
        topics=_split(
            "tomato plants; the compost heap; raised garden beds; the rose bushes; aphids on plants; "
            "clay soil; garlic bulbs; hydrangeas; a vegetable garden; mulched flower beds; "
            "succulent plants; moss in the lawn; fruit trees; seedlings on the windowsill"
        ),
        frames=(
            "Frost came early this year and hit {topic} hard.",
            "The garden centre had a whole display about {topic}.",
            "My neighbour swears by coffee grounds when it comes to {topic}.",
            "After weeks of rain, I mostly worry about {topic} in the backyard.",
            "The community allotment held a workshop on {topic} last spring.",
            "I spent the whole weekend outside dealing with {topic}.",
            "The seed catalogue has two pages about {topic}.",
            "Slugs and snails made {topic} much harder than I planned.",
        ),
        roles=_split("gardener; landscaper; allotment neighbour; nursery owner; horticulturist"),
        units=_unit_pairs(
            "square feet > square metres; gallons > litres; inches > centimetres; "
            "pounds of compost > kilograms"
        ),
        purposes=_split(
            "for the allotment society newsletter; for my plant Instagram; "
            "for the garden centre's noticeboard; for a community garden open day; "
            "for new members of the allotment; for my backyard vegetable blog"
        ),
        contexts=_split(
            "I have a small balcony with a few pots.; We just moved into a house with a big backyard.; "
            "My allotment plot is on a windy hill.; I'm a total beginner with plants."
        ),
    ),
    Domain(
        key="medicine",
        topics=_split(
            "high blood pressure; type 2 diabetes; migraine symptoms; antibiotic resistance; "
            "vaccination schedules; asthma treatment; iron deficiency in the blood; sleep apnea symptoms; "
            "a sprained ankle; blood cholesterol levels; allergy symptoms; physical therapy after surgery; "
            "kidney stones; flu treatment"
        ),
        frames=(
            "The clinic handed out leaflets about {topic} in the waiting room.",
            "My doctor wants to run more tests related to {topic}.",
            "The nurse spent ten minutes going over {topic} with my father.",
            "A new study in the journal looked at {topic} in older adults.",
            "The pharmacist warned me about {topic} when I picked up my prescription.",
            "The hospital opened a specialist ward for {topic}.",
            "Half the patients this week came in because of {topic}.",
            "Our health insurer sent a reminder about {topic}.",
        ),
        roles=_split("doctor; nurse; pharmacist; general practitioner; physiotherapist"),
        units=_unit_pairs(
            "milligrams > grams; degrees Fahrenheit > degrees Celsius; pounds > kilograms; "
            "millimoles per litre > milligrams per decilitre"
        ),
        purposes=_split(
            "for patients in our waiting room; for a clinic leaflet; for first-year nursing students; "
            "for the hospital's health newsletter; for a pharmacy poster; for my GP practice's website"
        ),
        contexts=_split(
            "My mother was just diagnosed.; I'm a first-year nursing student.; "
            "I have an appointment next week and want to be prepared.; "
            "My GP was in a hurry and I forgot to ask."
        ),
    ),
    Domain(
        key="finance",
        topics=_split(
            "investing in index funds; compound interest; refinancing a mortgage loan; "
            "credit card interest; retirement savings; inflation and savings; dividend investing; "
            "an emergency savings fund; capital gains tax; budgeting money; bond interest rates; "
            "a credit score for a loan; student loan repayments; currency exchange fees"
        ),
        frames=(
            "The bank sent me a letter explaining changes to {topic}.",
            "My accountant keeps bringing up {topic} at every meeting.",
            "The markets fell sharply and everyone started worrying about {topic}.",
            "Our household budget meeting turned into an argument about {topic}.",
            "The newspaper's money section ran a long piece on {topic}.",
            "My brother lost money last year because he ignored {topic}.",
            "The adviser drew a chart to show what {topic} means over thirty years.",
            "Payday is Friday, so I want to sort out {topic} before then.",
        ),
        roles=_split("financial adviser; accountant; bank manager; tax preparer; investor"),
        units=_unit_pairs(
            "US dollars > euros; basis points > percentage points; monthly interest percent > annual "
            "interest percent; British pounds > Japanese yen"
        ),
        purposes=_split(
            "for a personal finance blog; for the bank's customer newsletter; for a budgeting workshop; "
            "for new investors; for my money-saving podcast; for our credit union's members"
        ),
        contexts=_split(
            "I just got my first full-time job.; We're saving for a house deposit.; "
            "I'm thirty and have no savings yet.; My partner and I are merging our accounts."
        ),
    ),
    Domain(
        key="software",
        topics=_split(
            "memory leaks in the server; unit tests; REST API design; git rebase; database indexes; "
            "race conditions in code; code reviews; Docker containers; recursion in code; "
            "null pointer bugs; continuous integration tests; regular expressions; database caching; "
            "technical debt in old code"
        ),
        frames=(
            "The deploy failed again last night and the logs pointed at {topic}.",
            "Our tech lead scheduled a whole sprint for {topic}.",
            "The junior developer asked me about {topic} during the standup.",
            "The bug report from the customer mentions {topic}.",
            "We spent the afternoon pair programming on {topic}.",
            "The new framework handles {topic} very differently.",
            "The production outage was traced back to {topic}.",
            "Half of the pull requests this week touch {topic}.",
        ),
        roles=_split("software engineer; developer; tech lead; QA tester; DevOps engineer"),
        units=_unit_pairs(
            "gigabytes > megabytes; milliseconds > seconds; gigabits per second > megabytes per second; "
            "requests per second > requests per minute"
        ),
        purposes=_split(
            "for our engineering wiki; for the team's onboarding docs; for a developer meetup talk; "
            "for my coding bootcamp class; for the release notes; for a tech blog about backend code"
        ),
        contexts=_split(
            "I'm two months into my first developer job.; Our team is migrating a ten-year-old codebase.; "
            "I'm preparing for a technical interview.; The release deadline is on Friday."
        ),
    ),
    Domain(
        key="travel",
        topics=_split(
            "travel insurance for a trip; jet lag after long flights; a rail pass for Europe; "
            "visa applications; cheap hostels and hotels; carry-on luggage on flights; a road trip; "
            "vaccinations before a trip abroad; long airport layovers; the Schengen area; "
            "budget airline flights; a walking tour abroad; hotel loyalty points; overnight trains"
        ),
        frames=(
            "Our flight was delayed six hours, which made me think about {topic}.",
            "The tour guide spent the bus ride telling us about {topic}.",
            "The hotel receptionist gave me a brochure on {topic}.",
            "My friends planned the whole holiday around {topic}.",
            "At the airport I met a backpacker with strong views on {topic}.",
            "The guidebook has a short chapter on {topic}.",
            "Booking the trip took ages because of {topic}.",
            "The forum for backpackers is full of arguments about {topic}.",
        ),
        roles=_split("travel agent; tour guide; flight attendant; backpacker; hotel concierge"),
        units=_unit_pairs(
            "miles > kilometres; pounds of luggage > kilograms; hours of flight time > minutes; "
            "US dollars > Thai baht"
        ),
        purposes=_split(
            "for my travel blog; for a backpacking forum; for the hotel's welcome pack; "
            "for first-time flyers; for our tour company's newsletter; for a trip itinerary I'm sharing"
        ),
        contexts=_split(
            "I'm going abroad for the first time next month.; We're planning our honeymoon.; "
            "I fly for work almost every week.; I'm backpacking on a tight budget."
        ),
    ),
    Domain(
        key="music",
        topics=_split(
            "the circle of fifths; jazz improvisation; guitar chords; a string quartet; "
            "sight-reading piano scores; vinyl records; music theory for songs; drum fills in a band; "
            "vocal warm-ups before singing; the blues scale on guitar; tuning an orchestra; songwriting; "
            "piano scales; syncopation in songs"
        ),
        frames=(
            "The band rehearsed until midnight working on {topic}.",
            "My piano teacher assigned me homework on {topic}.",
            "The concert programme notes included a paragraph on {topic}.",
            "The radio host played three songs to illustrate {topic}.",
            "At the jam session nobody could agree about {topic}.",
            "The conservatory offers an evening course on {topic}.",
            "The producer in the studio kept coming back to {topic}.",
            "I spent an hour on {topic} before the audition.",
        ),
        roles=_split("guitar teacher; pianist; drummer; conductor; session guitarist"),
        units=_unit_pairs(
            "beats per minute > beats per second; hertz > kilohertz; inches > centimetres; minutes > seconds"
        ),
        purposes=_split(
            "for our band's website; for the choir newsletter; for my guitar students; "
            "for a concert programme; for the conservatory's open day; for my piano lesson notes"
        ),
        contexts=_split(
            "I've played guitar for two years.; Our choir has a concert in December.; "
            "I'm teaching myself piano from videos.; My son just joined the school band."
        ),
    ),
    Domain(
        key="chemistry",
        topics=_split(
            "covalent bonds between atoms; acid-base titration; the periodic table of elements; "
            "oxidation numbers; reaction rates; catalysts in chemical reactions; chemical equilibrium; "
            "isotopes of atoms; polymer molecules; molar mass; organic functional groups; electrolysis; "
            "noble gases; acid pH indicators"
        ),
        frames=(
            "Our lab session on {topic} ended early after a spill in the fume hood.",
            "The textbook chapter on {topic} is full of diagrams.",
            "The lab technician set up three beakers to demonstrate {topic}.",
            "My professor filled the whole board with equations about {topic}.",
            "The exam next week focuses on {topic}.",
            "A research group published a paper that challenges ideas about {topic}.",
            "The safety briefing before the experiment mentioned {topic} twice.",
            "The science fair winner built a project around {topic}.",
        ),
        roles=_split("research chemist; lab technician; science teacher; lab assistant; pharmacologist"),
        units=_unit_pairs(
            "millilitres > litres; atmospheres > kilopascals; kelvin > degrees Celsius; "
            "grams per litre > milligrams per millilitre"
        ),
        purposes=_split(
            "for my lab report; for a high school science class; for the lab safety poster; "
            "for first-year chemistry students; for our science fair booth; "
            "for a revision sheet on molecules and reactions"
        ),
        contexts=_split(
            "I'm studying for my final exam in the lab course.; I teach high school science.; "
            "I'm a first-year undergraduate.; I work in a quality control lab."
        ),
    ),
    Domain(
        key="history",
        topics=_split(
            "the fall of the Roman Empire; the French Revolution; the Silk Road trade routes; "
            "the Industrial Revolution; the Cold War; the pyramids of ancient Egypt; the printing press; "
            "the Renaissance; the Ottoman Empire; the Black Death in the 14th century; the Magna Carta; "
            "the space race during the Cold War; Viking voyages; the civil rights movement"
        ),
        frames=(
            "The museum opened a new exhibition on {topic}.",
            "Our teacher assigned a long essay on {topic}.",
            "The documentary last night covered {topic} in surprising detail.",
            "A historian on the radio argued that {topic} is widely misunderstood.",
            "The city archive holds hundreds of old letters about {topic}.",
            "The old textbook gets several facts about {topic} wrong.",
            "The walking tour of the old town ended with a story about {topic}.",
            "My grandfather kept a whole shelf of books on {topic}.",
        ),
        roles=_split("historian; museum curator; archaeologist; history teacher; archivist"),
        units=_unit_pairs(
            "centuries > years; leagues > kilometres; Roman miles > kilometres; decades > years"
        ),
        purposes=_split(
            "for a museum audio guide; for my history class; for the heritage society newsletter; "
            "for a walking tour of the old town; for a documentary script; for our local archive's website"
        ),
        contexts=_split(
            "I love reading about the past.; I'm preparing a lesson for my Year 9 class.; "
            "We're visiting Rome next spring.; I'm writing a novel set three hundred years ago."
        ),
    ),
    Domain(
        key="fitness",
        topics=_split(
            "interval training; deadlifts at the gym; marathon training; stretching after a workout; "
            "protein intake for muscles; core workouts; resting heart rate; yoga for beginners; "
            "sore muscles after exercise; push-up progressions; cycling endurance training; "
            "rest days between workouts; squats; home workouts"
        ),
        frames=(
            "My personal trainer changed my whole plan to focus on {topic}.",
            "The gym put up a poster about {topic} next to the treadmills.",
            "After a week focused on {topic} my legs felt like jelly.",
            "The running club's newsletter had a section on {topic}.",
            "Everyone in my spin class has an opinion about {topic}.",
            "The workout app keeps sending me reminders about {topic}.",
            "My training partner swears by {topic} for getting stronger.",
            "The podcast episode on {topic} changed how I train.",
        ),
        roles=_split("personal trainer; gym coach; yoga instructor; running coach; spin instructor"),
        units=_unit_pairs(
            "pounds > kilograms; miles > kilometres; minutes per mile > minutes per kilometre; "
            "calories > kilojoules"
        ),
        purposes=_split(
            "for my gym's noticeboard; for a running club newsletter; for my personal training clients; "
            "for a workout app; for the spin class group chat; for my fitness podcast"
        ),
        contexts=_split(
            "I'm training for my first half marathon.; I just joined a gym after ten years off.; "
            "I'm forty and want to get stronger.; I only have twenty minutes a day to exercise."
        ),
    ),
    Domain(
        key="real-estate",
        topics=_split(
            "a home inspection; closing costs on a house; property taxes; mortgage pre-approval; "
            "open houses; rental property yields; HOA fees; a fixer-upper house; the housing market; "
            "escrow when buying a home; a lease agreement; curb appeal when selling a home; "
            "a down payment on a house; zoning rules for property"
        ),
        frames=(
            "The realtor walked us through {topic} before the viewing.",
            "Our offer on the house almost fell apart because of {topic}.",
            "The listing says nothing about {topic}, which worries me.",
            "The property manager emailed every tenant about {topic}.",
            "Rising prices in our neighbourhood made us rethink {topic}.",
            "The seller's agent changed the subject whenever we asked about {topic}.",
            "The seminar for first-time buyers spent an hour on {topic}.",
            "We toured six apartments last weekend and learned a lot about {topic}.",
        ),
        roles=_split("estate agent; realtor; mortgage broker; landlord; property manager"),
        units=_unit_pairs("square feet > square metres; acres > hectares; feet > metres; US dollars > euros"),
        purposes=_split(
            "for our estate agency's website; for first-time home buyers; for a property listing; "
            "for my newsletter to landlords; for an open house flyer; for our mortgage advice blog"
        ),
        contexts=_split(
            "We're buying our first home.; I own two rental flats.; "
            "We're selling our house this summer.; I'm moving to a new city for work."
        ),
    ),
    Domain(
        key="pets",
        topics=_split(
            "house-training a puppy; cat litter boxes; dog grooming; aquarium filters for fish; "
            "adopting a rescue dog; flea treatments for cats and dogs; leash training a dog; "
            "hamster cages; dog food allergies; scratching posts for cats; parrot diets; "
            "crate training a puppy; pet insurance; caring for an older cat"
        ),
        frames=(
            "The vet gave us a printed sheet about {topic}.",
            "The new puppy made {topic} our main project this week.",
            "The pet shop assistant recommended a book on {topic}.",
            "The animal shelter runs a free class on {topic}.",
            "My neighbour's cat is the reason I started reading about {topic}.",
            "The regulars at the dog park love to argue about {topic}.",
            "We adopted a rescue last month and had to learn about {topic} fast.",
            "The owners' forum has a pinned thread on {topic}.",
        ),
        roles=_split("vet; dog trainer; pet sitter; groomer; animal shelter volunteer"),
        units=_unit_pairs(
            "pounds > kilograms; gallons > litres; cups of kibble > grams; dog years > human years"
        ),
        purposes=_split(
            "for our animal shelter's website; for new puppy owners; for the vet clinic's waiting room; "
            "for my pet-sitting clients; for a dog training class; for the pet shop noticeboard"
        ),
        contexts=_split(
            "We adopted a dog from the shelter last week.; I have two cats and a small flat.; "
            "My kids begged for a puppy and we finally said yes.; "
            "I'm looking after a friend's animals this month."
        ),
    ),
    Domain(
        key="photography",
        topics=_split(
            "aperture settings on a camera; long exposure photos; portrait lighting; "
            "the rule of thirds in photos; shutter speed; golden hour light; RAW photo files; "
            "prime lenses; street photography; white balance on a camera; depth of field; "
            "tripods for long shots; night sky photos; photo editing"
        ),
        frames=(
            "The photo walk this morning was all about {topic}.",
            "My camera club spent the meeting critiquing {topic}.",
            "The wedding photographer told me {topic} can make or break a shoot.",
            "The online course has a full module on {topic}.",
            "My holiday pictures came out blurry, so now I'm reading about {topic}.",
            "The camera manual has a confusing page on {topic}.",
            "The gallery exhibition included a wall dedicated to {topic}.",
            "The magazine's reader challenge this month is {topic}.",
        ),
        roles=_split("photographer; photo editor; wedding photographer; camera shop owner; photojournalist"),
        units=_unit_pairs("millimetres > inches; megabytes > gigabytes; feet > metres; megapixels > pixels"),
        purposes=_split(
            "for my photography blog; for our camera club; for a photo walk handout; "
            "for my portrait clients; for the gallery's website; for a beginners' camera workshop"
        ),
        contexts=_split(
            "I just upgraded from my phone to a real camera.; I'm shooting my cousin's wedding in June.; "
            "I sell prints at local markets.; I'm learning on an old film camera."
        ),
    ),
)

# -- request kinds ---------------------------------------------------------------------------
# A template's slots: {topic}, {topic2} (another), {topics} (one topic or two joined by "and"),
# {role}, {a_role} ("an astronomer"), {sentence} and {passage} (one or two of the domain's frames
# filled in), {remark} (a sentence, mostly with a reaction), {bad_sentence} (one with two slips),
# {n}, {lang}, {audience}, {form} (of a poem), {x} {unit_from} {unit_to}, and {purpose}
# (" for our stargazing club" 3 times in 4, else "").

KINDS: tuple[RequestKind, ...] = (
    RequestKind(
        key="translate",
        templates=(
            'Translate this into {lang}: "{sentence}"',
            "How would you translate this into {lang}? {sentence}",
            'Can you give me a natural {lang} translation of this sentence? "{sentence}"',
            "Please translate to {lang}, keeping the tone: {sentence}",
            'I need a {lang} translation of this line for a friend: "{sentence}"',
            '"{sentence}" What is that in {lang}?',
        ),
        extras=_split(
            "Keep the translation informal.; Please keep any names as they are.; "
            "A literal translation is fine.; Add a note if a word has no direct equivalent."
        ),
    ),
    RequestKind(
        key="summarize",
        templates=(
            "Summarize this in one sentence: {passage}",
            "Can you give me a short summary of the following? {passage}",
            "TL;DR summary, please: {passage}",
            "Boil this down to a one-line summary for my notes: {passage}",
            "What's the gist of this paragraph? {passage} A quick summary is fine.",
            "Summarize the text below briefly. {passage}",
        ),
        extras=_split("Under twenty words, please.; Just the main point.; Use plain language."),
    ),
    RequestKind(
        key="classify",
        templates=(
            'Is the sentiment of this comment positive, negative or neutral? "{remark}"',
            "Classify the sentiment of the following: {remark}",
            "Label the sentiment as positive, negative or neutral and nothing else: {remark}",
            'Does this comment sound happy, annoyed or indifferent? "{remark}"',
            "Sentiment check: {remark} Positive or negative?",
            "Would you call the sentiment of this comment optimistic or pessimistic? {remark}",
        ),
        extras=_split(
            "Answer with one word.; Give a confidence from 0 to 1 too.; "
            "Justify the sentiment label in a few words."
        ),
    ),
    RequestKind(
        key="poem",
        templates=(
            "Write a short poem about {topics}{purpose}.",
            "Could you compose a {form} on {topic} and {topic2}?",
            "I'd love a rhyming poem about {topic} for {a_role} who is retiring.",
            "Write a poem from the point of view of {a_role} thinking about {topic}.",
            "Turn {topic} into a {form}{purpose}, please.",
            "Give me four lines of poetry celebrating {topics}{purpose}.",
        ),
        extras=_split(
            "Make the poem rhyme.; Keep it gentle and a little funny.; No more than eight lines.; "
            "Use vivid imagery in every verse."
        ),
    ),
    RequestKind(
        key="convert",
        templates=(
            "Convert {x} {unit_from} to {unit_to}{purpose}.",
            "How many {unit_to} is {x} {unit_from}?",
            "What is {x} {unit_from} in {unit_to}?",
            "Quick conversion: {x} {unit_from} into {unit_to}, please.",
            "For my notes on {topics}, I have a figure of {x} {unit_from}. What is it in {unit_to}?",
            "Please change {x} {unit_from} into {unit_to} and show the formula.",
        ),
        extras=_split("Round to two decimals.; Show the working.; Just the number, please."),
    ),
    RequestKind(
        key="list",
        templates=(
            "List {n} facts about {topics}{purpose}.",
            "Give me a bullet list of {n} things every new {role} should know about {topic}.",
            "Make a checklist of {n} items on {topic}{purpose}.",
            "What are {n} common pitfalls with {topic} and {topic2}? A list is fine.",
            "Can you list {n} key ideas related to {topics}{purpose}?",
            "Jot down a list of {n} quick tips on {topic}{purpose}.",
        ),
        extras=_split("Number the list.; One line per item.; Put the most important item first."),
    ),
    RequestKind(
        key="explain",
        templates=(
            "Explain {topics} to {audience}{purpose}.",
            "Can you explain how {topic} works in simple terms{purpose}?",
            "I've never understood {topic}, even after asking {a_role}. Can you explain it?",
            "Help me understand {topic} and {topic2}; explain them as if I were {audience}.",
            "Explain what is meant by {topic} and why it matters to {a_role}.",
            "How would {a_role} explain {topic} to {audience}?",
        ),
        extras=_split("Use an analogy in the explanation.; Avoid jargon.; Two paragraphs at most."),
    ),
    RequestKind(
        key="grammar",
        templates=(
            "Fix the grammar in this sentence: {bad_sentence}",
            'Please correct the spelling and grammar: "{bad_sentence}"',
            "Proofread this and correct the mistakes: {bad_sentence}",
            "Can you correct the mistakes in this line? {bad_sentence}",
            "Is the grammar in this sentence correct? If not, fix it: {bad_sentence}",
            'Correct any typos and grammar mistakes here: "{bad_sentence}"',
        ),
        extras=_split(
            "Only return the corrected sentence.; List the mistakes you fixed.; "
            "Keep my wording where possible."
        ),
    ),
    RequestKind(
        key="email",
        templates=(
            "Write an email to the {role} asking about {topics}.",
            "Draft a polite email to {a_role} to ask for advice on {topics}.",
            "Help me write a short email requesting a meeting with {a_role} about {topic}{purpose}.",
            "Compose a follow-up email to the {role} I met last week about {topics}.",
            "Can you write a friendly thank-you email to {a_role} for their help with {topic}{purpose}?",
        ),
        extras=_split(
            "Keep the email under 150 words.; Make it sound professional.; Include a subject line."
        ),
    ),
    RequestKind(
        key="quiz",
        templates=(
            "Write {n} multiple-choice questions about {topics}{purpose}.",
            "Create a short quiz on {topics}{purpose}, with answers.",
            "Give me {n} true-or-false quiz questions to test a trainee {role} on {topic}.",
            "Make {n} flashcards about {topic} and {topic2}, a question on one side and the answer on the other.",
            "I'm running a trivia quiz night. Can you write {n} questions on {topic}{purpose}?",
            "Quiz me on {topic}: ask one question at a time, like {a_role} would.",
        ),
        extras=_split(
            "Mark the correct answers.; Make the questions progressively harder.; "
            "Four options for each question."
        ),
    ),
    RequestKind(
        key="compare",
        templates=(
            "What is the difference between {topic} and {topic2}?",
            "Compare {topic} with {topic2}{purpose}.",
            "{topic} or {topic2}: which matters more, and why?",
            "How do {topic} and {topic2} relate to each other?",
            "Contrast {topic} and {topic2} in a short table{purpose}.",
            "Can you weigh up {topic} against {topic2} for me?",
        ),
        extras=_split("Keep it balanced.; Give one example of each.; End with a recommendation."),
    ),
    RequestKind(
        key="howto",
        templates=(
            "How do I get started learning about {topics}? Step by step, please.",
            "Walk me through {topics} step by step{purpose}.",
            "What steps should a new {role} follow to deal with {topic}?",
            "Give me a step-by-step guide to {topic}{purpose}.",
            "I'm a beginner. What are the first steps when it comes to {topic} and {topic2}?",
            "Write the step-by-step instructions {a_role} would give a newcomer about {topic}.",
        ),
        extras=_split(
            "Number the steps.; Say which steps people usually skip.; Assume I have no special equipment."
        ),
    ),
    RequestKind(
        key="titles",
        templates=(
            "Suggest {n} catchy titles for a post about {topics}{purpose}.",
            "Give me {n} headline ideas for an article on {topics}{purpose}.",
            "What would be a few good titles for {a_role}'s talk on {topic}?",
            "Brainstorm {n} titles for a newsletter about {topic} and {topic2}.",
            "I need a punchy headline for a piece on {topic}{purpose}. Any ideas?",
            "Come up with {n} video titles about {topic} for {a_role}'s channel.",
        ),
        extras=_split("Make the titles playful.; Under eight words each.; Avoid clickbait headlines."),
    ),
    RequestKind(
        key="social-post",
        templates=(
            "Write a tweet about {topics}{purpose}.",
            "Draft a short social media post announcing our event on {topics}{purpose}.",
            "Write a social media caption for a photo related to {topic}{purpose}.",
            "Can you write a LinkedIn post sharing what I learned about {topic} from {a_role}?",
            "Give me a punchy social post about {topic} and {topic2}, with hashtags.",
            "Write a thread of three tweets about {topics}{purpose}.",
        ),
        extras=_split(
            "Add two hashtags.; Keep the post under 280 characters.; Add an emoji or two.; Make it upbeat."
        ),
    ),
    RequestKind(
        key="keywords",
        templates=(
            "Extract the keywords from this text: {passage}",
            "Pull out the main keywords in the following: {passage}",
            "What keywords would you tag this passage with? {passage}",
            "List the keywords and named concepts mentioned here: {passage}",
            "Give me comma-separated keyword tags for this note: {passage}",
        ),
        extras=_split("No more than five.; Lowercase only.; Order them by importance."),
    ),
    RequestKind(
        key="story",
        templates=(
            "Tell me a short story about {a_role} and {topic}.",
            "Write a bedtime story that involves {topics}{purpose}.",
            "Can you write a 200-word story where {a_role} has to deal with {topic}?",
            "Write a funny little story about {topics}{purpose}.",
            "Give me a story opening about {a_role} who wakes up thinking about {topic}.",
            "Invent a short story with a moral about {topic}{purpose}.",
        ),
        extras=_split(
            "Give the story a twist ending.; Make it suitable for children.; Keep the story under 300 words."
        ),
    ),
)

MAX_TASKS = len(KINDS) * len(DOMAINS)

# Slot values every domain shares.
LANGUAGES = _split("Spanish; French; German; Italian; Portuguese; Japanese; Dutch; Polish; Turkish; Korean")
AUDIENCES = _split(
    "a ten-year-old; a complete beginner; my grandmother; a university student; a busy manager; "
    "someone new to English; a curious teenager; a retired engineer"
)
COUNTS = _split("three; four; five; 5; six; seven; 8; ten")
POEM_FORMS = _split("haiku; limerick; sonnet; short ballad; free-verse poem; rhyming couplet")
VALUES = _split("2; 3.5; 12; 40; 75; 150; 0.8; 7; 18; 250; 1,200; 65")
REACTIONS = _split(
    "Loved it.; What a waste of an evening.; Not sure how I feel about it.; Best thing all year.; "
    "I was really disappointed.; It was fine, I suppose.; Absolutely brilliant.; "
    "That annoyed me more than it should have."
)
OPENERS = _split("Hi!; Hello.; Quick question.; Hey there.; Sorry if this is basic.")
CLOSERS = _split("Thanks!; Thank you.; Cheers.; Much appreciated.")


# -- tasks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticTask:
    """One routing task: `kind` of request about `domain`; `prompts(n, seed)` draws user prompts."""

    name: str
    kind: RequestKind = field(repr=False)
    domain: Domain = field(repr=False)

    def prompts(self, n: int, seed: int) -> list[str]:
        """n distinct prompts, the same for the same seed. No two of them, and no two prompts of
        seeds that differ modulo SEED_SPLITS, make the same request (differing only in what is
        around it: a closing instruction, a sentence of context, a greeting, a thank-you)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.kind.key}/{self.domain.key}/{seed}")
        split = seed % SEED_SPLITS
        requests: set[str] = set()
        prompts: list[str] = []
        misses = 0  # draws in a row that brought no new request of this seed's split
        while len(prompts) < n:
            request = _request(self.kind, self.domain, rng)
            if request in requests or _split_of(request) != split:
                misses += 1
                if misses > GIVE_UP_AFTER:
                    raise ValueError(
                        f"{self.name} has only about {len(prompts)} distinct prompts for seed {seed}; "
                        f"ask for fewer than {n}"
                    )
                continue
            misses = 0
            requests.add(request)
            prompts.append(_dressed(request, self.kind, self.domain, rng))
        return prompts


def synthetic_tasks(count: int, seed: int = 0) -> list[SyntheticTask]:
    """`count` tasks with distinct (kind, domain) pairs; the first min(#kinds, #domains) differ in
    both. The seed shuffles which kinds and domains come first; a pair's prompts do not depend on it."""
    if not 0 <= count <= MAX_TASKS:
        raise ValueError(
            f"count must be between 0 and {MAX_TASKS} ({len(KINDS)} request kinds x {len(DOMAINS)} domains), "
            f"got {count}"
        )
    rng = random.Random(seed)
    kinds = rng.sample(KINDS, len(KINDS))
    domains = rng.sample(DOMAINS, len(DOMAINS))
    tasks: list[SyntheticTask] = []
    for index in range(count):
        # Walk the diagonals of the kinds x domains grid: task i has kind i % K and domain
        # (i % K + i // K) % D, so for one kind each pass over the kinds brings a new domain.
        kind = kinds[index % len(kinds)]
        domain = domains[(index % len(kinds) + index // len(kinds)) % len(domains)]
        tasks.append(SyntheticTask(f"synth-{index:02d}-{domain.key}-{kind.key}", kind, domain))
    return tasks


# -- one prompt ------------------------------------------------------------------------------


def _request(kind: RequestKind, domain: Domain, rng: random.Random) -> str:
    """The request itself: one of the kind's templates filled from the domain."""
    topic, topic2, topic3 = rng.sample(domain.topics, 3)
    role = rng.choice(domain.roles)
    unit_from, unit_to = rng.choice(domain.units)
    sentences = [frame.format(topic=rng.choice(domain.topics)) for frame in rng.sample(domain.frames, 2)]
    slots = {
        "topic": topic,
        "topics": topic if rng.random() < 0.6 else f"{topic} and {topic3}",
        "topic2": topic2,
        "role": role,
        "a_role": f"an {role}" if role[0] in "aeiou" else f"a {role}",
        "sentence": sentences[0],
        "remark": f"{sentences[0]} {rng.choice(REACTIONS)}" if rng.random() < 0.75 else sentences[0],
        "passage": " ".join(sentences),
        "bad_sentence": _with_mistakes(sentences[0], rng),
        "n": rng.choice(COUNTS),
        "lang": rng.choice(LANGUAGES),
        "audience": rng.choice(AUDIENCES),
        "form": rng.choice(POEM_FORMS),
        "x": rng.choice(VALUES),
        "unit_from": unit_from,
        "unit_to": unit_to,
        "purpose": f" {rng.choice(domain.purposes)}" if rng.random() < 0.75 else "",
    }
    return _capitalized(rng.choice(kind.templates).format(**slots))


def _dressed(request: str, kind: RequestKind, domain: Domain, rng: random.Random) -> str:
    """The request as a user might send it: sometimes with one of the kind's closing instructions,
    a sentence of context or a greeting before it, a thank-you after it. A long request (a
    passage to summarize) gets no context or greeting, to stay around 40 words at most."""
    prompt = request
    if rng.random() < 0.4:
        prompt = f"{prompt} {rng.choice(kind.extras)}"
    draw = rng.random()
    if len(request.split()) <= 28:
        if draw < 0.4:
            prompt = f"{rng.choice(domain.contexts)} {prompt}"
        elif draw < 0.5:
            prompt = f"{rng.choice(OPENERS)} {prompt}"
    if rng.random() < 0.1:
        prompt = f"{prompt} {rng.choice(CLOSERS)}"
    return prompt


def _with_mistakes(sentence: str, rng: random.Random) -> str:
    """The sentence with two slips of a hurried typist: a doubled word, swapped letters, no capital,
    no final full stop."""
    words = sentence.split()
    slips = rng.sample(("double", "swap", "lower", "stop"), 2)
    if "swap" in slips:
        long_words = [i for i, word in enumerate(words) if len(word) >= 6 and word.isalpha()]
        if long_words:
            i = rng.choice(long_words)
            j = rng.randrange(1, len(words[i]) - 2)
            word = words[i]
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    if "double" in slips:
        i = rng.randrange(1, len(words) - 1)
        words.insert(i, words[i])
    text = " ".join(words)
    if "lower" in slips:
        text = text[0].lower() + text[1:]
    if "stop" in slips:
        text = text.rstrip(".")
    return text


def _capitalized(text: str) -> str:
    return text[0].upper() + text[1:]


def _split_of(request: str) -> int:
    """Which of SEED_SPLITS buckets a request belongs to: stable across runs and platforms."""
    return int.from_bytes(hashlib.sha256(request.encode()).digest()[:4], "big") % SEED_SPLITS
